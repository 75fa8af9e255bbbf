"""The web dashboard: static pages served by the API itself at `/`, which call the same JSON
routes as every other client, with the API key the person signs in with."""
