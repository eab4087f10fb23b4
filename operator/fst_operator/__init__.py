"""The fastslow operator (kopf): TaskStream -> FastSlowRuns -> trainer Jobs.

Not named `operator`: that is a standard-library module. Run it with `python -m fst_operator`
(see __main__.py); handlers.py has the handlers, builders.py the pure logic.
"""
