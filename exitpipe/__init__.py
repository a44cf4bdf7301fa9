"""The composition root: settings and the command line. Nothing imports this package."""
