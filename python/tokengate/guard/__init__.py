"""The Guard House: per-operation health, circuit breakers, the code inspector, spike
detection with quarantine and replay, and the execution history."""
