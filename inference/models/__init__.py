"""Model lifecycle: several models and versions in one server, loaded, validated and swapped at run time.

``registry.py`` holds one engine per loaded version and hands the serving layer the active
version of a model under a lease (a request finishes on the version it started on);
``memory.py`` estimates a version's weights + KV cache and refuses a load that does not fit;
``validation.py`` probes a new version and shadow-runs recent prompts against the active one;
``admin.py`` is the authenticated admin API (its own port) in front of the registry;
``errors.py`` are the errors both sides share (no torch, no HTTP).
"""
