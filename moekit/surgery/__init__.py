"""Surgery: pure functions from source tensors and config to an output plan. No files, no CLI."""
