"""Rollout: sampler, LLM backends, the ReAct agent, environments and judges."""
