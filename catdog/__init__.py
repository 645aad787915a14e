"""catdog: fine-tune image classifiers with Accelerate, then mine what they learned."""
