//! The outbound proxy: hyper server, routing by Host, retries, timeouts.
