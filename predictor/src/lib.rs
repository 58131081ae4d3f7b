//! Routing-path prediction. Pure: no IO, no threads.
