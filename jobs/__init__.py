"""jobs: the job spec (pydantic) and the command line (typer). Imports `cluster` and below."""
