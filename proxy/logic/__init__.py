"""Pure decisions, no I/O and no clock of their own: the split and stickiness, load balancing,
the circuit breaker, admission (in-flight limits and queues), the retry budget, statistics, the
sequential analysis and the rollout strategies. Everything above calls into these; they import
nothing of Turnout's but each other."""
