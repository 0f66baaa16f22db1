"""peftkit's built-in adapter methods, registered through the `peftkit.methods` entry points."""
