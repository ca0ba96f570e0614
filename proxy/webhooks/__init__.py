"""Per-meeting webhooks (issue 9): the hooks registry, event intake, privacy filter, delivery."""
