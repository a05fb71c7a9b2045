//! Permits: storage tiers, per-key concurrency and rate limits (filled in by the policy work).
