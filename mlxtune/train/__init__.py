"""mlxtune's training engine: adapters (`adapters`), the step (`step`), the loop (`loop`), checkpoints (`checkpoint`)."""
