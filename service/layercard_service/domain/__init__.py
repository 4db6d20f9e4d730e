"""The records every process shares: tuning jobs and their specs, Layer Cards, plans and budget kinds.

Plain dataclasses with their validation and dict codecs (they live as JSON in the database and travel to
worker processes). Imports only the foundations (errors) and data sources; nothing here does IO.
"""
