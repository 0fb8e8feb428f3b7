"""Thin integrations of moe_balance with training frameworks (imported lazily)."""
