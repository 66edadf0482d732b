"""The node as a libp2p peer: host, discovery, gossip, request streams, peer scoring."""
