"""mediasieve runtime: config, distribution, manifest, storage tiers, queue, workers, model pool, writer."""
