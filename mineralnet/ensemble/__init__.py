"""Ensembles of trained runs (`mineralnet ensemble`): averaged calibrated probabilities, the members'
disagreement as a novelty score, and `Predictor("ENS")` / `mineralnet eval ENS` / `mineralnet predict ENS`."""
