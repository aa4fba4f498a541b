"""Routing state: the registry of provider sessions, eligibility, breakers, the admission queue.

This layer imports only `protocol/` and the settings and store beside it; the nursery above
it drives it, and nothing here knows about HTTP.
"""
