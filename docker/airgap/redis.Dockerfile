# Air-gapped stand-in for the official redis image: Debian's redis-server and redis-cli. Like
# the official image it runs `redis-server ...` in /data (a volume), here as the redis user,
# with its entrypoint's contract (redis/docker-entrypoint.sh: protected mode off).
ARG BASE_IMAGE=runops-airgap/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir /data && chown redis:redis /data
COPY redis/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
USER redis
ENTRYPOINT ["docker-entrypoint.sh"]
EXPOSE 6379
CMD ["redis-server"]
