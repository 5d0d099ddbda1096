"""Importable apps for tests that start servers the way users do (``uvicorn module:app``)."""
