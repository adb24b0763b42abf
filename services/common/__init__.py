"""Code that several services share: configuration, storage, messaging, time, privacy."""
