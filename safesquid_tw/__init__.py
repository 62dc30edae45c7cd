"""safesquid-tw: a clustered secure web gateway built on Twisted."""

__version__ = "0.1.0"
