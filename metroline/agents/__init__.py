"""Agents as first-class work (issue 15): tools so far; runs, guards and the runtime follow."""
