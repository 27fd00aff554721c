"""The modelplane adapters: the realtime sidecar and the batch job runner."""

#: The plane's secret for its realtime adapters (the local runtime sets it): with it, an adapter
#: answers only requests carrying it in SECRET_HEADER. The adapter takes it out of its own
#: environment at start, so the model it runs never sees it.
SECRET_ENV = "MODELPLANE_ADAPTER_SECRET"
SECRET_HEADER = "X-Modelplane-Secret"
