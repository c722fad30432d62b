"""The engines' shared core: StageRunner (one stage's forward, backward and step with weight
versions) and the exact single-process Simulator.

    from pipenag import Schedule, Simulator, make_runner
"""
