"""The gateway: the platform's one door for providers and end users (FastAPI under uvicorn).

    uvicorn --factory cipherpool.gateway.app:create_app --host 127.0.0.1 --port 8080

It authenticates bearer credentials, enforces size caps and rate limits before reading a
body, and turns requests into service calls and Celery messages that carry ids only. The
broker and the database stay private to platform processes.
"""
