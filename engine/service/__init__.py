"""HTTP service: an API and a web page over the library, for high-throughput lookup."""
