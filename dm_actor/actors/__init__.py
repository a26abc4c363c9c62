"""Device actors: one Trio task per registered device, and the supervisor that owns them."""
