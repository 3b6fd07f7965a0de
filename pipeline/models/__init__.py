"""Layer 1, models: device and precision choice, and loading the vision-language models and masked LMs."""
