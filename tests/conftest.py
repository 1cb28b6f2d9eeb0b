import os

from hypothesis import HealthCheck, settings

# `ci`: derandomized (the same examples every run) and enough of them to mean it; `dev`: quicker local runs.
settings.register_profile(
    'ci', derandomize=True, max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    'dev', max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'dev'))
