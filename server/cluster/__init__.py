"""Sessions placed on GPU sets across many machines by Ray Serve (docs/cluster.md).

`liveavatar serve --cluster ADDRESS` runs a front door (`frontdoor.py`: the page, `/ws` signalling, auth,
TURN credentials, `/healthz`, `/metrics`) that holds no model and no peer connection. The sessions run on
replicas (`replica.py`), a Ray Serve deployment whose every replica is the single-host server of
server/app.py on its own GPU set or CPU slot (`replica_app.py`): media flows between the browser and the
replica's host. One job per module, data flowing one way:

    deploy.py     the Serve application from the settings: deploy it, or attach to a running one
    router.py     placement: a new session to the replica with the most room (Serve's request router)
    autoscale.py  how many replicas the sessions need (Serve's autoscaling policy)
    replica.py    the Serve deployment: a session's placement and lifetime as one streaming request
    replica_app.py  the replica's server: the single-host App behind the front door's relay
    registry.py   where the front door finds every replica and its latest figures
    relay.py      one WebSocket from the front door to a replica, for one client's session
    frontdoor.py  the front door
    view.py       the cluster's `/metrics` and `/healthz`, from the replicas' reports

Nothing here is imported by the single-host server; `ray` is imported only by these modules (the
`cluster` extra: `pip install liveavatar[cluster]`).
"""
