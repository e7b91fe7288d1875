"""coordinator: a filesystem-inbox coordinator for multi-agent AI teams."""
__version__ = "0.1.0"
