# The stack's load balancer: Debian's nginx-light on a root filesystem made by mmdebstrap
# (scripts/build-stack-images.sh), so no registry is needed.
ARG ROOTFS=toolserver-stack-lb-rootfs:bookworm
FROM ${ROOTFS}
COPY nginx.conf /etc/nginx/toolserver.conf
USER www-data
EXPOSE 8080
ENTRYPOINT ["nginx", "-c", "/etc/nginx/toolserver.conf"]
