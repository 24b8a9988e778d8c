"""Configuration: the typed settings object and the Celery configuration built from it."""

from cipherpool.config.settings import Settings, get_settings, reset_settings

__all__ = ["Settings", "get_settings", "reset_settings"]
