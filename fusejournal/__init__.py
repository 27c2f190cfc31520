"""fusejournal: a journaling FUSE filesystem for consistent, continuously updated backups."""

__version__ = "0.1.0"
