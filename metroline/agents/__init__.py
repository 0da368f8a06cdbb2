"""Agents as first-class work (issue 15): tools and guards so far; runs, the store and the runtime follow."""
