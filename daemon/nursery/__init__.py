"""The daemon's structured-concurrency core.

The supervisor nursery owns every long-lived task (provider sessions, the registry's timers,
the admission queue); each consumer request runs its racers in a dispatch nursery of its own.
"""
