"""Site-local training: the prepared site's slide index, splits, and (next) the trainer."""
