"""Notifications: what is noticed (notices), the rules and delivery (notify), the outbox and
the webhook bodies."""
