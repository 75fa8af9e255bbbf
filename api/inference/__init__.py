"""The inference face: OpenAI's `/v1/models`, `/v1/chat/completions` and `/v1/completions`
over the models this server trained. The API resolves the model a tenant names and forwards
the request over HTTP to the engine serving its base (`api.inference.engine_client`); it never
loads a model itself."""
