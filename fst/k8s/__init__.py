"""Kubernetes API types of fastslow (FastSlowRun, TaskStream) and their CRDs.

Pure data: nothing here talks to a cluster. The operator (operator/fst_operator) does.
"""
