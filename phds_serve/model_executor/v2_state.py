"""V2 model runner (GPU) hook: per-request k into the step plan.

Placeholder until wired: raises so that a misconfiguration is loud.
"""
