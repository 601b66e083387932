-- The scoring request of every benchmark: POST with a 44-byte JSON body, like a client of
-- /api/v1/service/{name}/score. The URL (and so the path) and any Authorization header come from
-- the wrk command line (-H). No response() callback: it would slow wrk down.
wrk.method = "POST"
wrk.body = '{"data":[[5.1,3.5,1.4,0.2],[6.2,2.9,4.3,1]]}'
wrk.headers["Content-Type"] = "application/json"
