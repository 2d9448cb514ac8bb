"""/v1/responses (placeholder)."""


def add_routes(app, state):
    pass
