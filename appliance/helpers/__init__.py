"""Small pieces every program of the project shares: settings checks, the MQTT client, CLI parsing."""
