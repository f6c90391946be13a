"""cluster: the job driver (plan, place work on Ray, track, retry, resume, commit output).

May import `workers` and `qvlm`; must not import `jobs`; does no tensor math itself.
"""
