"""GPU/CPU worker: pulls jobs from Redis Streams, generates, publishes chunks."""
