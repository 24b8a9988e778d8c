"""The platform's Celery application (``celery -A cipherpool.tasks`` finds it as ``app``)."""

from cipherpool.config.celery import create_app

app = create_app()
