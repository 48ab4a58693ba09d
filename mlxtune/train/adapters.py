"""Put LoRA/DoRA layers on a model (mlx-lm's layers) and describe them so `mlx_lm --adapter-path` loads them."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlxtune.settings import AdapterSettings


def adapted_layer_count(model, settings: AdapterSettings) -> int:
    """Blocks to adapt: all by default; asking for more than the model has means all of them."""
    total = len(model.layers)
    return total if settings.layers is None else min(settings.layers, total)


def adapter_config(model, settings: AdapterSettings) -> dict:
    """The adapter_config.json that mlx-lm (and mlxtune) read back."""
    lora_parameters = {"rank": settings.rank, "scale": settings.scale, "dropout": settings.dropout}
    if settings.target_modules:
        lora_parameters["keys"] = list(settings.target_modules)
    return {
        "fine_tune_type": settings.method,
        "num_layers": adapted_layer_count(model, settings),
        "lora_parameters": lora_parameters,
        "alpha": settings.alpha,
    }


def check_target_modules(model, settings: AdapterSettings) -> None:
    """Every named module must exist in the blocks: a typo would otherwise train nothing."""
    if not settings.target_modules:
        return
    from mlxtune.errors import UsageError

    names = {name for name, _ in model.layers[0].named_modules()}
    missing = [m for m in settings.target_modules if m not in names]
    if missing:
        linear = sorted(n for n, m in model.layers[0].named_modules() if hasattr(m, "weight") and "." in n)
        raise UsageError(f"no module {', '.join(missing)} in this model's blocks",
                         f"target modules here: {', '.join(linear)}")


def attach_adapters(model, settings: AdapterSettings) -> dict:
    """Freeze the base and make the adapters (or, for `full`, the last blocks) trainable. Returns the config."""
    check_target_modules(model, settings)
    config = adapter_config(model, settings)
    model.freeze()
    if settings.method == "full":
        for block in model.layers[-config["num_layers"] :]:
            block.unfreeze()
    else:
        linear_to_lora_layers(
            model, config["num_layers"], config["lora_parameters"], use_dora=settings.method == "dora"
        )
    return config


def trainable_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count as their unpacked size."""
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for v in trainable_weights(model).values())
    return trainable, get_total_parameters(model)
