"""Media handling: probing containers now; video/ and audio/ decoding build on it."""
